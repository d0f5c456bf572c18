"""The built-in model organism's loader and shipped files, so any job can load it (files.py), and the
arithmetic it learned (synthetic.py). How it is made and what it does: jobs._organism (README.md)."""
