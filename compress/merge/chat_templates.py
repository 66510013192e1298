"""The chat templates a mergekit recipe may name (``chat_template: chatml``): the public ChatML, Llama 3, Alpaca,
Mistral-instruct and EXAONE turn formats, written here so that they render the same strings as the templates
mergekit 0.1.5 ships under those names (checked by tests/test_merge_slices.py on a battery of conversations), the
whitespace of mergekit's files included (transformers renders with trim_blocks and lstrip_blocks).
"""

from __future__ import annotations

CHATML = (r"{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

LLAMA3 = (r"{% for m in messages %}{{ (bos_token if loop.first else '') + '<|start_header_id|>' + m['role'] + "
          r"'<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>\n' }}{% endfor %}"
          r"{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# the last system message heads the prompt; user, assistant and user_context turns become sections
ALPACA = (r"{% set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
          r"{% set heads = {'user': 'Instruction', 'assistant': 'Response', 'user_context': 'Input'} %}"
          r"{{ (systems | last).content | trim if systems else '' }}{{ '\n\n' }}"
          r"{% for m in messages %}{% if m['role'] in heads %}"
          r"{{ '### ' + heads[m['role']] + ':\n' + m['content'] | trim }}{{ '' if loop.last else '\n\n' }}"
          r"{% endif %}{% endfor %}"
          r"{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\n' }}{% endif %}")

# an optional system message goes into the first [INST] block; then strictly user, assistant, user, ...
MISTRAL = (r"{% set has_system = messages[0]['role'] == 'system' %}"
           r"{% set turns = messages[1:] if has_system else messages %}{{ bos_token }}"
           r"{% for m in turns %}"
           r"{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           r"{{ raise_exception('mistral chat template: after an optional system message the roles alternate "
           r"user, assistant, user, ...') }}{% endif %}"
           r"{% if m['role'] == 'user' %}"
           r"{{ ' [INST] ' + (messages[0]['content'] + '\n\n' if loop.first and has_system else '') + m['content'] + "
           r"' [/INST]' }}"
           r"{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
           r"{% else %}{{ raise_exception('mistral chat template: only user and assistant turns, after an optional "
           r"system message') }}{% endif %}{% endfor %}")

EXAONE = (r"{% for m in messages %}"
          r"{% if loop.first and m['role'] != 'system' %}{{ '        [|system|][|endofturn|]\n\n' }}{% endif %}"
          r"{{ '    [|' + m['role'] + '|]' + m['content'] + '\n' }}"
          r"{{ '        \n\n' if m['role'] == 'user' else '        [|endofturn|]\n\n' }}{% endfor %}"
          r"{% if add_generation_prompt %}{{ '    [|assistant|]\n' }}{% endif %}")

NAMED = {"alpaca": ALPACA, "chatml": CHATML, "exaone": EXAONE, "llama3": LLAMA3, "mistral": MISTRAL}
