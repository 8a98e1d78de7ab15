"""Planning: which tier every block of every matrix gets, before a method prunes it.

allocation.py is the byte-budget math (the multiple-choice knapsack over (tier) per block);
sensitivity.py the gradient pass that makes losses of different matrices comparable.
"""
