"""fusionlang: a declarative language and compiler for deep model fusion."""

__version__ = "0.1.0"
