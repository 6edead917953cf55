"""The bodies of /v1/vfolders requests, validated as every /v1 body is (see :mod:`..requests`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from ..requests import ByteSize, RequestModel, not_null, shown

MAX_NAME = 64
Permission = Literal["ro", "rw"]


def check_name(name: str) -> str:
    """A vfolder name as users give it, or ValueError saying what a name must be."""
    if not name:
        raise ValueError("is required: the vfolder's name, e.g. 'data'")
    if len(name) > MAX_NAME:
        raise ValueError(f"must have at most {MAX_NAME} characters ({len(name)} given)")
    if "/" in name or "\\" in name:
        raise ValueError(f"cannot contain '/' or '\\' ({shown(name)})")
    if name.startswith("."):
        raise ValueError(f"cannot start with a dot ({shown(name)})")
    if name != name.strip() or not name.isprintable():
        raise ValueError(f"cannot have control characters or surrounding spaces ({shown(name)})")
    return name


def _positive(quota: int) -> int:
    if quota <= 0:
        raise ValueError("must be more than 0 bytes")
    return quota


# Unique among the caller's vfolders; kernels see the vfolder at ~/<name>.
VFolderName = Annotated[str, AfterValidator(check_name)]
Quota = Annotated[ByteSize, AfterValidator(_positive)]


class VFolderCreate(RequestModel):
    """POST /v1/vfolders (quota and volume left out or null: the gateway's defaults)."""

    name: VFolderName
    quota: Quota | None = None
    volume: str | None = None


class VFolderPatch(RequestModel):
    """PATCH /v1/vfolders/{vid}: a new name, a new quota; a field left out stays as it is."""

    name: Annotated[VFolderName | None, not_null(VFolderName)] = None
    quota: Annotated[Quota | None, not_null(Quota)] = None


class AcceptInvitation(RequestModel):
    """POST /v1/vfolders/invitations/{iid}/accept: the name the invitee will know the vfolder by
    (left out or null: the owner's)."""

    name: VFolderName | None = None


class Invite(RequestModel):
    """POST /v1/vfolders/{vid}/invitations."""

    user: Annotated[str, Field(min_length=1)]
    permission: Permission = "rw"


class ShareUpdate(RequestModel):
    """PUT /v1/vfolders/{vid}/shares/{user}: what the invitee may do from now on."""

    permission: Permission


class Mkdir(RequestModel):
    """POST /v1/vfolders/{vid}/mkdir."""

    path: str
    # Create the missing folders on the way too, and take a directory that exists.
    parents: bool = False


class Move(RequestModel):
    """POST /v1/vfolders/{vid}/move."""

    src: str
    dst: str
    # Replace what is at dst (a file, or an empty directory).
    overwrite: bool = False


class Copy(RequestModel):
    """POST /v1/vfolders/{vid}/copy (nothing at dst is replaced)."""

    src: str
    dst: str


class UploadStart(RequestModel):
    """POST /v1/vfolders/{vid}/uploads: a resumable upload of a file of a known size."""

    path: Annotated[str, Field(min_length=1)]
    size: Annotated[int, Field(ge=0)]
