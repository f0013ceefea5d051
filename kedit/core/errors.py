"""kedit's exceptions, grouped by area.

Each class inherits a built-in exception so that ordinary `except` clauses still work, and
carries its subject as a field. The CLI turns every `KeditError` into one line on stderr
and a non-zero exit (see `kedit.cli`); anything else is a bug and shows a traceback.
"""

from __future__ import annotations


class KeditError(Exception):
    """Base class: a problem the user can act on, reported in one line."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


# REPOSITORY ERRORS


class RepositoryNotFoundError(KeditError, FileNotFoundError):
    """No `.kedit` directory in the given path or any of its parents."""

    hint = "run 'kedit init' to create one, or pass --repo PATH"


class RepositoryExistsError(KeditError, FileExistsError):
    """`kedit init` where a repository already is."""


class LockedError(KeditError, TimeoutError):
    """Another process holds the writer lock longer than we were willing to wait."""

    hint = "wait for the other kedit command to finish (or raise KEDIT_LOCK_TIMEOUT)"


class IncompleteRepositoryError(KeditError, RuntimeError):
    """A repository whose `kedit init` (or `kedit clone`) was interrupted before it finished."""

    def __init__(self, path: object) -> None:
        super().__init__(f"the repository at {path} was not completely initialised (interrupted init?); "
                         "run 'kedit init' again to finish or clear it")
        self.path = path


class SchemaError(KeditError, RuntimeError):
    """The database was written by a newer kedit."""


class ReadOnlyRepositoryError(KeditError, PermissionError):
    """A command that writes, on a repository this user may only read."""

    hint = "read commands (log, show, status, diff, export, fsck) work; run this one as a user who can write it"


# REVISION AND REF ERRORS


class RevisionError(KeditError, LookupError):
    """A revision that names no commit, or more than one."""

    def __init__(self, message: str, *, rev: str) -> None:
        super().__init__(message)
        self.rev = rev


class RefNameError(KeditError, ValueError):
    """A branch or tag name that is not allowed."""


class BadNameError(KeditError, ValueError):
    """A name from outside (tensor, file, id, Hub path) that breaks kedit's grammar (kedit/core/names.py),
    or a write whose destination would leave its folder."""


class RefExistsError(KeditError, FileExistsError):
    """Creating a branch or tag that already exists."""


class StaleRefError(KeditError, RuntimeError):
    """A ref moved between reading and updating it (compare-and-swap failed)."""


class HeadMovedError(StaleRefError):
    """HEAD (or the branch it is on) moved while an edit was computed on the model it pointed to."""

    hint = "run the edit again"


class MergeConflictError(KeditError):
    """The two sides of a merge disagree (kedit.core.conflicts); nothing was changed."""

    hint = "kedit merge --take ours|theirs keeps one side's edits where they conflict; --take SUBJECT=SIDE, by subject"

    def __init__(self, message: str, conflicts: list, *, total: int | None = None) -> None:
        super().__init__(message)
        self.conflicts = conflicts  # those left to resolve
        self.total = len(conflicts) if total is None else total  # all the merge has, some covered by --take


class MergeCheckError(KeditError):
    """Probes broke at a merge commit (`kedit merge --check`); the merge was undone."""

    hint = "kedit merge without --check keeps it; kedit check names what broke"

    def __init__(self, message: str, broken: list) -> None:
        super().__init__(message)
        self.broken = broken  # kedit.eval.probes.ProbeResult of each probe the merge broke


# OBJECT AND INTEGRITY ERRORS


class ObjectMissingError(KeditError, FileNotFoundError):
    def __init__(self, object_id: str) -> None:
        super().__init__(f"object {object_id} is missing from the store", hint="run 'kedit fsck'")
        self.object_id = object_id


class CorruptObjectError(KeditError, ValueError):
    def __init__(self, object_id: str, detail: str) -> None:
        super().__init__(f"object {object_id} is damaged: {detail}", hint="run 'kedit fsck'")
        self.object_id = object_id


class HashMismatchError(KeditError, ValueError):
    """A materialised tensor does not hash to what its commit recorded."""

    def __init__(self, name: str, expected: str, actual: str, commit_id: str | None = None) -> None:
        from kedit.core.refs import short_id  # here: refs imports this module

        where = f" at commit {short_id(commit_id)}" if commit_id else ""
        super().__init__(
            f"tensor {name}{where} hashes to {short_id(actual)}, expected {short_id(expected)}",
            hint="run 'kedit fsck'",
        )
        self.name, self.expected, self.actual = name, expected, actual


class ExternalFileError(KeditError, FileNotFoundError):
    """A --no-copy base file that moved or changed since `kedit init`."""


# MODEL AND INPUT ERRORS


class ModelSourceError(KeditError, ValueError):
    """A path or id that is not a model kedit can read."""


class MethodNotFoundError(KeditError, KeyError):
    """An editing method no installed module registers."""

    def __str__(self) -> str:  # KeyError's own would quote the message
        return str(self.args[0])


class DeltaError(KeditError, ValueError):
    """A delta that does not fit the tensor it is meant for, or that produces non-finite values."""


class WorktreeDirtyError(KeditError, RuntimeError):
    """The working model has changes that a checkout would overwrite."""

    hint = "run 'kedit status' to see them, or pass --force to discard them"


# HUB ERRORS


class RemoteError(KeditError, LookupError):
    """An unknown remote, or a remote URL kedit cannot use."""


class HubError(KeditError, ConnectionError):
    """The Hub could not be reached, refused the token, or rejected a request."""


class PushRejectedError(HubError):
    """The remote branch has commits this push would overwrite (it moved since the last pull)."""

    hint = "run 'kedit pull' to bring its commits here, then push again"
