"""`python -m pipeline`: the main job (see pipeline/main.py)."""

from pipeline.main import main

if __name__ == "__main__":
    main()
