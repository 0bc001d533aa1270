"""rt-polarity for lm-eval: the sentences of rt-polarity.neg and rt-polarity.pos (the file is
the label), one test split whose rows alternate negative, positive so that lm-eval's `limit` (the
first N docs) stays balanced. Fields: text, label (0 negative, 1 positive: the index into the
choices).
"""

from pathlib import Path


def load(data_dir: str, **_metadata):
    """The YAML's custom_dataset: lm-eval calls it with dataset_kwargs and the task's metadata."""
    import datasets  # lm-eval's own dependency

    folder = Path(data_dir)
    negative = read_lines(folder / "rt-polarity.neg")
    positive = read_lines(folder / "rt-polarity.pos")
    if len(negative) != len(positive):
        raise ValueError(
            f"{folder}: {len(negative)} negative and {len(positive)} positive sentences; the "
            "rows alternate one of each, so both files must hold as many"
        )
    texts, labels = [], []
    for neg, pos in zip(negative, positive):
        texts += [neg, pos]
        labels += [0, 1]
    return datasets.DatasetDict(
        {"test": datasets.Dataset.from_dict({"text": texts, "label": labels})}
    )


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"no file {path} (rt-polarity's sentences, one a line)")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
