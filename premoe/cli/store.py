"""`premoe store`."""
from premoe.cli import not_built

command = not_built("store")
