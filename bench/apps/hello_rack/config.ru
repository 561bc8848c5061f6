# Hello world as a bare Rack app (no framework, no gems): what bench/ruby_hello.py serves.
run ->(env) { [200, {"content-type" => "text/plain", "content-length" => "14"}, ["Hello, world!\n"]] }
