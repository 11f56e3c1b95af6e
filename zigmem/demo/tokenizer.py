"""The tokenizer a GGUF file carries: byte-level BPE from its vocabulary and merges."""

from __future__ import annotations

from ..errors import WeightFormatError

CONTROL, USER_DEFINED = 3, 4  # GGUF token types that are matched whole, never split


class GGUFTokenizer:
    """Byte-level BPE (``tokenizer.ggml.model == "gpt2"``) built with the ``tokenizers``
    library from the file's ``tokenizer.ggml.*`` keys; digits are split one by one, as the
    SmolLM pre-tokenizer does. The tables are built on first use (encode / decode).

    Example:
        >>> ids = tok.encode("Hello")
        >>> tok.decode(ids)
        'Hello'
    """

    def __init__(self, metadata: dict) -> None:
        if metadata.get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(f"only byte-level BPE (gpt2) tokenizers are supported, not "
                             f"{metadata.get('tokenizer.ggml.model')!r}")
        # Building the BPE tables takes ~0.3 s for a 49k vocabulary, longer than mapping the
        # whole model: it waits for the first encode / decode, so loading stays fast.
        self._metadata = metadata
        self._built = None
        self.vocab_size = len(metadata["tokenizer.ggml.tokens"])
        self.bos_id = metadata.get("tokenizer.ggml.bos_token_id")
        self.eos_id = metadata.get("tokenizer.ggml.eos_token_id")
        self.chat_template = metadata.get("tokenizer.chat_template", "")

    @property
    def _tok(self):
        if self._built is None:
            self._built = self._build(self._metadata)
        return self._built

    @staticmethod
    def _build(metadata: dict):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        tokens = list(metadata["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", ())]
        types = metadata.get("tokenizer.ggml.token_type")
        try:
            bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
        except Exception as e:  # tokenizers raises a bare Exception for a bad vocabulary
            raise WeightFormatError(f"the file's tokenizer is inconsistent: {e}") from None
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tok.decoder = decoders.ByteLevel()
        if types is not None:
            tok.add_special_tokens([tokens[i] for i, t in enumerate(types)
                                    if t in (CONTROL, USER_DEFINED)])
        return tok

    @property
    def im_end_id(self):
        return self._tok.token_to_id("<|im_end|>")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def chat(self, prompt: str, system: str | None = None) -> str:
        """The prompt in the model's chat format (ChatML, as SmolLM2's template writes it),
        ending where the assistant's answer begins."""
        if "<|im_start|>" not in self.chat_template:
            return prompt
        system = system or "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
        return (f"<|im_start|>system\n{system}<|im_end|>\n"
                f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")

    def stops(self) -> set[int]:
        return {i for i in (self.eos_id, self.im_end_id) if i is not None}
