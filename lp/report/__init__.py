"""Tables (pandas, no torch) and figures (matplotlib) from run records; experiments/aggregate.py and
experiments/figures.py are their command lines, notebooks/ draw the same inline."""
