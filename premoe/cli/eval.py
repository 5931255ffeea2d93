"""`premoe eval`."""
from premoe.cli import not_built

command = not_built("eval")
