"""Evaluation: task metrics (wrapping sacrebleu, rouge-score and seqeval), the
perplexity of a language model over long text, and small report writers."""
