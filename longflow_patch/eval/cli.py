"""``longflow-lm-eval``: the ``lm_eval`` command, same command line, with ``longflow_hf``
registered explicitly; the fallback wherever the start-up hook of `longflow_patch.eval.hook`
does not run (``python -S``, a site-packages that skips ``.pth`` files)."""


def main() -> None:
    import lm_eval.models  # noqa: F401  (lm-eval's built-in models first: see longflow_patch.eval.hook)
    from lm_eval.__main__ import cli_evaluate

    from longflow_patch.eval.hook import register

    register()
    cli_evaluate()


if __name__ == "__main__":
    main()
