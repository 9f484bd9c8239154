-- The W3C traceparent of the request that accepted the message: delivery attempts join its trace.
ALTER TABLE messages ADD COLUMN traceparent TEXT NOT NULL DEFAULT '';
