"""SmSA for lm-eval: the test split's rows taken one label at a time, in turn (positive, neutral,
negative, positive, ...; each label's rows in the file's order, a label left out once it has none
left), so that lm-eval's `limit` (the first N docs) keeps all three. In the file's own order the
first 200 rows are 126 negative, 74 positive and no neutral one.
"""

LABELS = ("positive", "neutral", "negative")  # the order of the YAML's doc_to_choice


def interleave_labels(dataset):
    """The YAML's process_docs: the same rows, reordered; a label outside LABELS is refused."""
    by_label = {label: [] for label in LABELS}
    for index, label in enumerate(dataset["label"]):
        if label not in by_label:
            raise ValueError(f"row {index}: label {label!r}; SmSA's labels are {', '.join(LABELS)}")
        by_label[label].append(index)
    order = []
    for turn in range(max(len(rows) for rows in by_label.values())):
        order += [rows[turn] for rows in by_label.values() if turn < len(rows)]
    return dataset.select(order)
