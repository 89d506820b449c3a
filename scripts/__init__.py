"""Tools around the lesson: online rounds, plots, export. Run from the repository root: python -m scripts.plot"""
