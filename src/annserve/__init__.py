"""annserve: a gRPC service that streams AnnData minibatches to PyTorch trainers.

``annserve.server`` is the daemon (stores, samplers, preload buffers),
``annserve.client`` the trainer-side :class:`~annserve.client.RemoteLoader`,
``annserve.v1`` the generated protocol stubs and :mod:`annserve.wire` the frame
codec both sides share.
"""

__version__ = "0.1.0"
