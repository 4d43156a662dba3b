"""The qwen_1_5 ChatML template of LLaVA-NeXT-Interleave, used when a tokenizer has none."""

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# <|im_start|>role\n…<|im_end|>\n per turn; the generation prompt opens an assistant turn.
QWEN_1_5_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
