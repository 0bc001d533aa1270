"""Build tokenizers/rt-polarity-bpe/: the byte-level BPE tokenizer jobs/demo-lm.yaml ships with.

    python tokenizers/build_rt_polarity_bpe.py

How it was made: Hugging Face `tokenizers`' BpeTrainer, on a ByteLevel pre-tokenizer (no prefix
space) with the 256 byte symbols as its initial alphabet, trained on every sentence of
../shared/data/rt-polarity (rt-polarity.pos, then rt-polarity.neg: 10,662 lines, read as UTF-8),
to a vocabulary of 4,096 tokens, the first three `<s>` (BOS), `</s>` (EOS) and `<pad>`. Like a
Llama tokenizer it puts `<s>` before a text unless asked for no special tokens (quantbench's
perplexity and generation ask for none and put the BOS there themselves). Its model_input_names
are input_ids and attention_mask: a decoder takes no token_type_ids.

It saw every rt-polarity sentence, the demo's evaluation sample included. That is a tokenizer's
vocabulary, not a model's training: the demo's model is trained only on the sentences outside its
evaluation sample, and a word of the evaluation sample it never read is still a sequence of known
byte-level tokens either way.

The script writes exactly that folder (tokenizer.json, tokenizer_config.json,
special_tokens_map.json), replacing what was there; run twice, it writes the same bytes. The tests
(tests/lm_models.py) build their small tokenizers with build_tokenizer below.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RT_POLARITY = REPO.parent / "shared" / "data" / "rt-polarity"
FOLDER = REPO / "tokenizers" / "rt-polarity-bpe"
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
VOCAB_SIZE = 4096
BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def rt_polarity_sentences(folder: Path = RT_POLARITY) -> list[str]:
    """Every sentence of the corpus, positive file first, in file order."""
    return [
        line
        for name in ("rt-polarity.pos", "rt-polarity.neg")
        for line in (folder / name).read_text(encoding="utf-8").splitlines()
    ]


def build_tokenizer(
    sentences: list[str],
    vocab_size: int = VOCAB_SIZE,
    bos: bool = True,
    eos: bool = True,
    pad: bool = True,
):
    """A byte-level BPE trained on the sentences, as a PreTrainedTokenizerFast that adds its BOS
    (when it has one) before every text, as Llama's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [token for token, wanted in [(BOS, bos), (EOS, eos), (PAD, pad)] if wanted]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(sentences, trainer)
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", special_tokens=[(BOS, backend.token_to_id(BOS))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS if bos else None,
        eos_token=EOS if eos else None,
        pad_token=PAD if pad else None,
        model_input_names=["input_ids", "attention_mask"],
    )


def write_folder(tokenizer, folder: Path = FOLDER) -> Path:
    """The tokenizer's three files, and nothing else, in folder (replaced whole)."""
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for name in FILES:
            if (Path(scratch) / name).exists():
                shutil.copyfile(Path(scratch) / name, folder / name)
    return folder


def main() -> int:
    if not RT_POLARITY.is_dir():
        print(f"error: {RT_POLARITY} is not there: the data belongs beside this checkout, in "
              "../shared/data", file=sys.stderr)  # fmt: skip
        return 1
    folder = write_folder(build_tokenizer(rt_polarity_sentences()))
    print(f"wrote {folder}: {', '.join(p.name for p in sorted(folder.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
