"""`python -m keras_paligemma ...` runs the command-line tool."""

from keras_paligemma.cli import main

main()
