"""Exporter errors and their exit codes: 2 for bad input, 1 for a failed export."""


class ExportError(Exception):
    exit_code = 1


class ExportInputError(ExportError):
    """The source, the options or the output directory cannot be used."""

    exit_code = 2


class ExportFailure(ExportError):
    """The export ran but its result failed verification or a stage broke."""

    exit_code = 1


class MissingExtraError(ExportInputError):
    def __init__(self, module: str) -> None:
        super().__init__(
            f"the exporter needs '{module}', which comes with the export extra: "
            "pip install 'embedrank[export]'"
        )
