"""Built on convert + loader + formats: inspect/verify, push, batch plans and runs, demo, samples."""
