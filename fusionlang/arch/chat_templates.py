"""Named chat templates for `tokenizer(..., chat_template="chatml")`: the five names
MergeKit 0.1.5 accepts (`chat_template: chatml` in its YAML), written here as Jinja for
transformers' `apply_chat_template` (which renders with trim_blocks and lstrip_blocks).

- chatml, llama3, mistral: render exactly as MergeKit's templates do (and refuse what
  they refuse: llama3 and mistral need the tokenizer's bos / eos tokens).
- alpaca, exaone: the formats as their authors define them. MergeKit's files render the
  same text with stray whitespace (alpaca: two leading newlines without a system message
  and no blank line before a generation prompt's "### Response:"; exaone: the template's
  indentation in the output); tests/test_vocab.py checks both against MergeKit's, equal
  but for whitespace.
"""

from __future__ import annotations

CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

LLAMA3 = (
    "{%- for message in messages -%}"
    "{{ (bos_token if loop.first else '') + '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + (message['content'] | trim) + '<|eot_id|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

MISTRAL = (
    "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none -%}"
    "{%- set turns = messages[1:] if system is not none else messages -%}"
    "{{- bos_token -}}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != loop.index0 is even -%}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ ' [INST] ' ~ (system ~ '\\n\\n' if loop.first and system is not none else '') ~ message['content'] ~ ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ ' ' + message['content'] + eos_token }}"
    "{%- else -%}"
    "{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
    "optional system message!') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

ALPACA = (
    "{%- set headers = {'user': '### Instruction:\\n', 'assistant': '### Response:\\n', "
    "'user_context': '### Input:\\n'} -%}"
    "{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}"
    "{%- set ns = namespace(sep='') -%}"
    "{%- if systems -%}{{ systems[-1]['content'] | trim }}{%- set ns.sep = '\\n\\n' -%}{%- endif -%}"
    "{%- for message in messages if message['role'] in headers -%}"
    "{{ ns.sep ~ headers[message['role']] ~ (message['content'] | trim) }}{%- set ns.sep = '\\n\\n' -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{ ns.sep ~ '### Response:\\n' }}"
    "{%- endif -%}"
)

EXAONE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}{{ '[|system|][|endofturn|]\\n' }}{%- endif -%}"
    "{{ '[|' ~ message['role'] ~ '|]' ~ message['content'] }}"
    "{{ '\\n' if message['role'] == 'user' else '[|endofturn|]\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '[|assistant|]' }}{%- endif -%}"
)

NAMED = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL, "alpaca": ALPACA, "exaone": EXAONE}
