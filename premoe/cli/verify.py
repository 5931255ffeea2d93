"""`premoe verify`."""
from premoe.cli import not_built

command = not_built("verify")
