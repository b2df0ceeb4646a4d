"""The Space (``app.py``): configuration, upload intake, scheduling, output files, rendering, handlers and the page.

``app.py`` parses the command line, loads the detector and launches ``layout.build_demo``; everything else lives
here, one job per module."""
