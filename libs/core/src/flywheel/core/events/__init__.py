"""Events: topics and types, the envelope, the transactional outbox and its relay, and the
two event buses (Kafka and the embedded log) behind one protocol."""
