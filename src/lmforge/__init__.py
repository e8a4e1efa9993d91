"""lmforge: from raw text to a trained, evaluated and served language model, with one CLI."""
