"""A Google Cloud Storage emulator on 127.0.0.1, for the ``gs://`` tests (no network).

`bucket()` starts gcp-storage-emulator (pure Python, in memory, in a thread of this process)
once per process and points the three clients that touch a ``gs://`` workdir at it:

* tensorstore, which writes and reads orbax's arrays: ``TENSORSTORE_GCS_HTTP_URL``, with
  ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` as its credentials;
* gcsfs, `etils.epath`'s ``gs://`` backend without TensorFlow (directories, JSON, renames,
  metrics files): ``STORAGE_EMULATOR_HOST``, anonymous, without its gRPC bucket-layout probe
  (``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``), which the emulator does not serve;
* google-auth: its metadata-server look-ups go to a closed loopback port.

tensorstore reads its URL once per process, hence one emulator for the whole test process;
`environment()` gives a subprocess (``python -m jaxkd.main --workdir=gs://...``) the same
settings. `_complete_the_emulator` adds the two pieces of the GCS API these clients use that
the emulator lacks. It ignores GCS preconditions (``ifGenerationMatch``), which only matter
with concurrent writers.
"""

import atexit
import contextlib
import logging
import os
import socket
import uuid
from http import HTTPStatus

import pytest

BUCKET = "jaxkd-test"
_SERVER_URL = None


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def _client_environment(url: str) -> dict[str, str]:
  return {
    "TENSORSTORE_GCS_HTTP_URL": url,
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
    "STORAGE_EMULATOR_HOST": url,
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "FSSPEC_GCS_TOKEN": "anon",  # read when fsspec is imported (a subprocess's case)
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
  }


def _start() -> str:
  for module in ("gcsfs", "gcp_storage_emulator"):  # the 'test' extra (CI fails without)
    pytest.importorskip(module)
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  # Before gcsfs is imported: it reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT then.
  os.environ.update(_client_environment(url))
  import fsspec
  import gcsfs
  from gcp_storage_emulator.server import create_server

  assert gcsfs.GCSFileSystem.__name__ == "GCSFileSystem", (
    "gcsfs was imported with its gRPC layout probe on: tests/conftest.py turns it off"
  )
  fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"  # fsspec is imported already
  _complete_the_emulator()
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server._api.daemon = True  # a serving thread left running would block the interpreter's exit
  server.start()
  server._api._httpd.handle_error = lambda request, client_address: None
  atexit.register(server.stop)
  return url


def _complete_the_emulator() -> None:
  """What the clients need and gcp-storage-emulator lacks.

  * ``x-goog-generation`` with an object's bytes: tensorstore needs it ("Malformed
    StorageGeneration" without).
  * The ``moveTo`` call gcsfs renames with: without it gcsfs retries with back-off (seconds per
    object) before falling back to copy + delete.
  * Quiet: the emulator logs every missing object at ERROR (tensorstore probes for absent
    ones), and its HTTP server prints a traceback when a client closes a connection early.
  """
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects

  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    with contextlib.suppress(Exception):  # not found: the 404 stands
      params = request.params
      obj = storage.get_file_obj(params["bucket_name"], params["object_id"])
      response["x-goog-generation"] = obj["generation"]
      response["x-goog-metageneration"] = obj["metageneration"]

  def move(request, response, storage, *args, **kwargs):
    request.params["dest_bucket_name"] = request.params["bucket_name"]
    objects.copy(request, response, storage)
    if response.status == HTTPStatus.OK:
      storage.delete_file(request.params["bucket_name"], request.params["object_id"])

  objects.download = download_with_generation
  move_route = (
    r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
    r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$"
  )
  server.HANDLERS = ((move_route, {"POST": move}), *server.HANDLERS)
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)


def bucket() -> str:
  """A fresh ``gs://`` prefix on the emulator (started on first use)."""
  global _SERVER_URL
  if _SERVER_URL is None:
    _SERVER_URL = _start()
  return f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}"


def environment() -> dict[str, str]:
  """The variables a subprocess needs to use the emulator, e.g. for
  ``python -m jaxkd.main --workdir=<bucket()>`` (the emulator serves from this process)."""
  bucket()
  return _client_environment(_SERVER_URL)
