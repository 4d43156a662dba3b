"""Names and values every layer shares; the bottom floor, importing nothing of mmscene."""

IMAGE_PLACEHOLDER = "<image>"  # one per image in a conversation, expanded to tokens by encode
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # label of positions without loss (prompt, padding, image tokens)
MODEL_PARTS = ("vision", "projector", "llm")  # what freeze / lr / param counts are keyed by


def front_images(n: int) -> str:
    """The ``n`` placeholders put in front of a question that has none: ``<image> <image>``,
    as LLaVA's evaluation code (and lmms-eval's LLaVA models) write them."""
    return " ".join([IMAGE_PLACEHOLDER] * n)
