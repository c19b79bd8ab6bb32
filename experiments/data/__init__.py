"""Scripts that build corpora for the experiments (see build_local_corpus.py)."""
