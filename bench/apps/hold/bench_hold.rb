# frozen_string_literal: true

# Rack middleware in front of the Rails test app, for bench/lifecycle.py's growth runs.
#
# bench/lifecycle.py copies tests/apps/rails_app to a temp dir, puts this file next to its
# config.ru and adds `require_relative "bench_hold"` and `use BenchHold` at the top. Every request
# goes to Rails, but `GET /__bench/hold`:
#
# 1. writes bench-arrivals/PID.arrived (the time it arrived);
# 2. serves 20 Rails requests in-process (`/` and `/items/1`), so that the process has done real
#    work before its memory is measured, and writes bench-arrivals/PID.warmed;
# 3. waits while the file bench-hold exists (at most 120 s), keeping the process busy, so that the
#    server has to spawn a new process for the next request;
# 4. answers its pid.
class BenchHold
  HOLD_FILE = File.join(__dir__, "bench-hold")
  ARRIVALS = File.join(__dir__, "bench-arrivals")
  WARM_PATHS = ["/", "/items/1"].freeze
  WARM_REQUESTS = 20
  MAX_HOLD_S = 120.0

  def initialize(app)
    @app = app
  end

  def call(env)
    return @app.call(env) unless env["PATH_INFO"] == "/__bench/hold"

    mark("arrived")
    WARM_REQUESTS.times { |i| serve(env, WARM_PATHS[i % WARM_PATHS.size]) }
    mark("warmed")
    deadline = monotonic + MAX_HOLD_S
    sleep 0.01 while File.exist?(HOLD_FILE) && monotonic < deadline
    [200, { "content-type" => "text/plain" }, ["#{Process.pid}\n"]]
  end

  private

  def monotonic
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end

  def mark(kind)
    path = File.join(ARRIVALS, "#{Process.pid}.#{kind}")
    File.write("#{path}.tmp", Time.now.to_f.to_s)
    File.rename("#{path}.tmp", path)
  end

  def serve(env, path)
    _status, _headers, body = @app.call(
      env.merge("PATH_INFO" => path, "QUERY_STRING" => "", "REQUEST_URI" => path)
    )
    body.each { |_chunk| nil }
  ensure
    body.close if body.respond_to?(:close)
  end
end
