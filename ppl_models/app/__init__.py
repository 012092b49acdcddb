"""The application layer: configuration files, experiments with run directories, the command line.

The only layer that knows about files and commands; it may import every layer below it
(models, guides, inference, tasks).
"""
