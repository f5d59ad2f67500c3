"""molt: post-training of language models as a DAG of cached, content-addressed stages."""

__version__ = "0.1.0"
