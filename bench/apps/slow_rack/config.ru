# A Rack app whose every request takes 0.5 s (no framework, no gems): bench/lifecycle.py's burst.
# The answer names the process that served it (x-pid), so that the benchmark can count the
# processes a burst of requests was spread over.
run lambda { |_env|
  sleep 0.5
  [200, { "content-type" => "text/plain", "content-length" => "14", "x-pid" => Process.pid.to_s },
   ["Hello, world!\n"]]
}
