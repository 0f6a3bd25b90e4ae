"""`python -m pipeline`: the main job. Until the staged pipeline lands it runs the foundation's smoke run."""

from pipeline.smoke import main

if __name__ == "__main__":
    main()
