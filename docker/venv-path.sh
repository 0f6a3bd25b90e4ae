# KubeRay and the Ray cluster launcher run their commands in login shells, and Debian's /etc/profile resets PATH:
# put the project's virtualenv (made by `make venv` in the image) first again.
export PATH="/app/.venv/bin:${PATH}"
