"""Chat transcripts: one record per exchange in LOG_DIR/chat.jsonl.

- assembly: a Transcript fed the request and the relayed response, finished into a record (pure)
- shapes: how each API's answer and stream events become the record's response (pure)
- frames: the wire between a serving process and the transcript writer (pure)
- events: the one event per ended exchange that the request path emits
- sender: frames transcript events out to the writer (or a worker's supervisor)
- service: keeps the writer process running
- writer: the writer process, appending records to chat.jsonl
"""
