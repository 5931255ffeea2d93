"""`premoe serve`."""
from premoe.cli import not_built

command = not_built("serve")
