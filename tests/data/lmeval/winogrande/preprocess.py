"""Winogrande's multiple-input scoring: each option fills the blank to make one context, and the model scores the
same continuation (the text after the blank) after each; the gold context is the answer's option."""


def doc_to_text(doc):
    """The gold context's index: answer "1" or "2"."""
    return {"1": 0, "2": 1}[doc["answer"]]


def doc_to_target(doc):
    """The continuation: everything after the blank."""
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def doc_to_choice(doc):
    """The contexts: the sentence up to the blank, filled with each option."""
    head = doc["sentence"][: doc["sentence"].index("_")]
    return [head + doc["option1"], head + doc["option2"]]
