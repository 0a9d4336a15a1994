"""Edward2's one abstraction in PyTorch: random variables, and tracing to transform programs.

with tape() as rvs: model()          # record the named random variables
condition(model, y=obs)              # fix some of them
log_joint(model)(x, w=w, y=y)        # score the program at given values
"""

from hpcbnn.ppl.random_variable import RandomVariable, random_variable
from hpcbnn.ppl.tracing import condition, log_joint, tape, trace, traceable

__all__ = ["RandomVariable", "condition", "log_joint", "random_variable", "tape", "trace", "traceable"]
