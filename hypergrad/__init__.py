"""hypergrad: learn an optimizer family's coefficients while the model trains.

Public API:
    HyperOptimizer, MADA, HyperAdam, HyperSGD   -- drop-in torch.optim optimizers (optimizer.py)
    Level                                       -- one level of a hyper-optimizer tower (tower.py)
"""
from .tower import CoefficientLayout, Level, LR_COEFFICIENT, level_update
from .optimizer import BACKENDS, SHARING, HyperAdam, HyperOptimizer, HyperSGD, MADA
from .graph import family_graph, tower_graph, draw

__all__ = ["HyperOptimizer", "MADA", "HyperAdam", "HyperSGD", "Level", "CoefficientLayout", "LR_COEFFICIENT",
           "level_update", "BACKENDS", "SHARING", "family_graph", "tower_graph", "draw"]
