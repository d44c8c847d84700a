"""How a problem's plain steps run: eager, or captured once per batch shape and replayed (an engine component)."""

from .compiled import ExecutionChoice, StepExecution, plan_executions
from .hvp import CompiledHVP, plan_hvps

__all__ = ["CompiledHVP", "ExecutionChoice", "StepExecution", "plan_executions", "plan_hvps"]
