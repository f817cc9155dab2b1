"""Checks that learners call on their exercise answers, one module per chapter (``ch01`` ...).

Each check raises nothing: it prints what is right or what is wrong and returns a bool,
so that a learner can call it again and again in a notebook.
"""
