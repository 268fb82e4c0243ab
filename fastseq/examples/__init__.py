"""Runnable examples: python -m fastseq.examples.train_lm"""
