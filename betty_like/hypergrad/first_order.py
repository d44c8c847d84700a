"""``first_order``: unrolled steps with the Hessian terms in the lower problem's own weights dropped.

Each step's gradient is taken at detached weights (:func:`~.unroll.window_gradient` with
``through_w=False``), so reverse mode through the window follows only the mixed derivative with
respect to the upper parameters: the first-order MAML / DARTS-first-order approximation. It still
differentiates the gradient once more, so it needs double backward through the model.
"""

from __future__ import annotations

from ._method import Method

METHOD = Method(
    "first_order",
    "unrolled steps differentiated only through the upper parameters (Hessian in the lower weights dropped)",
    None,
    through_w=False,
    steps_optimizer=True,
)
