"""What a rule is scored on. Today: :mod:`nos_sym.tasks.rosenbrock`, the paper's Figure 6; the
package will hold the general task interface that wraps it and the other tasks."""

from nos_sym.tasks import rosenbrock

__all__ = ["rosenbrock"]
