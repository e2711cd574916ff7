"""The REST ``/v1`` features, one folder each: ``router`` (handlers), ``protocol`` (REST
schemas) and ``mapping`` (REST <-> protobuf)."""
