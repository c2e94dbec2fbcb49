"""python -m glideserve"""

from glideserve.cli import main

main()
