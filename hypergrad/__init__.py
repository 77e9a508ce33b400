"""hypergrad: learn an optimizer family's coefficients while the model trains.

Public API:
    HyperOptimizer, MADA, HyperAdam, HyperSGD   -- drop-in torch.optim optimizers (optimizer.py)
    Level                                       -- one level of a hyper-optimizer tower (tower.py)
    checkpoint.save / load / restore            -- safe, atomic checkpoints (checkpoint.py)
    gradcheck.check_hypergradients              -- finite-difference check (python -m hypergrad.gradcheck)
    unroll.unrolled_hypergradients              -- multi-step truncated unrolls (unroll.py)
    family_graph, tower_graph, draw             -- pictures of families and towers (graph.py)
"""
from . import checkpoint
from .tower import CoefficientLayout, Level, LR_COEFFICIENT, level_update
from .optimizer import BACKENDS, NONFINITE, SHARING, HyperAdam, HyperOptimizer, HyperSGD, MADA
from .graph import family_graph, tower_graph, draw

__all__ = ["HyperOptimizer", "MADA", "HyperAdam", "HyperSGD", "Level", "CoefficientLayout", "LR_COEFFICIENT",
           "level_update", "BACKENDS", "SHARING", "NONFINITE", "family_graph", "tower_graph", "draw", "checkpoint"]
