"""How a problem's plain steps run: eager, or captured once per batch shape and replayed (an engine component)."""

from .compiled import ExecutionChoice, StepExecution, plan_executions

__all__ = ["ExecutionChoice", "StepExecution", "plan_executions"]
