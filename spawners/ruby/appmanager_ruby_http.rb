# frozen_string_literal: true

# Whole connections for the Ruby shim (docs/protocol/handoff.md, "Whole connections (ASGI, Rack)").
#
# The core hands a process whole client connections (C) when its app gets every request. The
# process then reads and parses each connection's requests itself and serves them one at a time,
# across all the connections it holds, so that a keep-alive client's next request costs the core
# nothing. A watcher thread gives the other connections back to the core (S, B, R) while a request
# runs long, or while requests wait their turn, so that their clients are not held up behind it
# and the core, seeing them wait, can start more processes. Loaded by appmanager_ruby.rb; Ruby's
# standard library only.

require "tempfile"

module AppManager
  # The core's limits (appmanager/request.py and front.py): a process that reads a connection
  # itself refuses what the core would.
  MAX_HEAD = 8 * 1024
  MAX_BODY = 1 << 30
  MAX_CHUNK_LINE = 1024
  # Seconds a connection may stay quiet between requests, and may take to send one.
  IDLE_TIMEOUT = 75
  READ_TIMEOUT = 60
  # After a response that closes the connection, what the client still sends is read and thrown
  # away for this long, so that unread bytes do not make the kernel reset the connection.
  LINGER_TIME = 2
  READ_SIZE = 64 * 1024
  # A body up to this size is kept in memory; a bigger one goes to a temporary file.
  BODY_IN_MEMORY = 64 * 1024
  # A connection stops being read while this much waits unparsed behind its current request.
  MAX_BUFFERED = 1024 * 1024
  # A request running this long, or waiting this long for its turn, makes the process busy (S) and
  # its other connections go back (B); so does a new connection the core sent while a request has
  # run NEW_CONNECTION_AFTER: its client would wait behind it.
  BUSY_AFTER = 0.05
  NEW_CONNECTION_AFTER = 0.01
  WATCH_INTERVAL = 0.01
  # Bytes read and not served that may go back with a connection; more stay with the process.
  MAX_GIVE_BACK = 60 * 1024
  # Requests counted before an N message reports them (fewer when max_requests is small).
  COUNT_EVERY = 100
  MAX_LOG_FIELD = 8 * 1024
  # A slot's states (handoff.md): idle between requests, a request received, its response begun.
  SLOT_IDLE = 0
  SLOT_RECEIVED = 1
  SLOT_RESPONDING = 2
  CONTINUE = "HTTP/1.1 100 Continue\r\n\r\n"
  HTTP_VERSIONS = { "HTTP/1.1" => true, "HTTP/1.0" => true }.freeze
  REFUSALS = {
    400 => "Bad Request", 408 => "Request Timeout", 413 => "Content Too Large",
    417 => "Expectation Failed", 431 => "Request Header Fields Too Large",
    501 => "Not Implemented"
  }.freeze
  CHUNK_SIZE = /\A[0-9a-fA-F]+\z/.freeze
  # A request head: a request line, then field lines "name: value" with a token for a name
  # (RFC 9110 5.1), each ending in CRLF, then the empty line.
  HEAD_FORMAT = %r{\A[^\r\n]+\r\n(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n]*\r\n)*\r\n\z}.freeze

  # A request the shim refuses, with the status it answers.
  class HttpError < StandardError
    attr_reader :status

    def initialize(status, reason)
      super(reason)
      @status = status
    end
  end

  # What the slot of a connection's current request is written with: Response writes the mark
  # before the response's first byte.
  class SlotMark
    def initialize(progress, slot)
      @progress = progress
      @slot = slot
    end

    def write(word)
      @progress.set_slot(@slot, word)
    end
  end

  # One client connection the process holds whole, from C to X (closed) or B (given back).
  #
  # Holds the bytes read and not yet parsed, and the request being received: its env once the
  # head is in, then its body as it arrives. Invariant: env is nil between requests; ready is true
  # once the body is complete and until the request is served.
  class HttpConnection
    attr_reader :io, :writer, :mark, :seq, :slot, :raddr, :rport, :saddr, :sport, :scheme
    attr_accessor :buf, :env, :ready, :number, :last_active, :started, :eof, :lingering,
                  :request_info, :head_line, :ready_at

    def initialize(io, seq, slot, progress, fields, data)
      @io = io
      @writer = ClientConnection.new(io)
      # Where each response records its start (the connection's slot), made once.
      @mark = SlotMark.new(progress, slot)
      @seq = seq
      @slot = slot
      @raddr, @rport, @saddr, @sport, @scheme = fields
      @buf = data
      @env = nil
      @ready = false
      # The number of the current (or last) request on the connection, from 1; the core wrote
      # the first one's RECEIVED into the slot before it sent C.
      @number = 0
      @last_active = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      # When the request now arriving began to arrive (READ_TIMEOUT); nil between requests.
      @started = nil
      @eof = false
      @lingering = nil
      # The request being received: [is_head, http11, client_close, client_keepalive, upgrade].
      @request_info = nil
      @head_line = nil
      # When the request became whole (it waits from then on to be served).
      @ready_at = nil
      # The request parsed and not yet served, as the client sent it (head, and body so far), so
      # that it can go back to the core with its connection; nil past MAX_GIVE_BACK.
      @raw = nil
      # The body: where it goes and how much is still to come.
      @body = nil
      @body_left = 0
      @chunk_state = nil
      @chunk_left = 0
      @received = 0
    end

    # Not in the middle of a response, and what was read and not served is small enough to go
    # back to the core with the connection (B): between requests, or with a request parsed and
    # waiting its turn.
    def returnable?
      return false if @lingering

      size = @buf.bytesize
      size += @raw ? @raw.bytesize : MAX_GIVE_BACK + 1 if @env
      size <= MAX_GIVE_BACK
    end

    # What goes back to the core with the connection: the bytes read and not served. Forgets the
    # request parsed from them.
    def give_back_bytes
      data = @env ? @raw + @buf : @buf
      @body.close if @body.is_a?(Tempfile)
      @body = nil
      @env = nil
      @raw = nil
      @ready = false
      data
    end

    # The request is being served: its bytes are no longer needed.
    def served
      @env = nil
      @raw = nil
      @ready = false
      @started = nil
    end

    # Parses what is buffered, as far as it goes; true once a whole request is ready. Raises
    # HttpError for a request to refuse.
    def parse(worker)
      return true if @ready

      if @env.nil?
        return false unless parse_head(worker)
      end
      read_body
      @ready
    end

    # The body, as rack.input; nil when there is none.
    def take_body
      body = @body
      @body = nil
      body
    end

    private

    def parse_head(worker)
      buf = @buf
      start = 0
      # RFC 9112 2.2: empty lines before a request line are ignored.
      start += 2 while buf.byteslice(start, 2) == CRLF
      stop = buf.index("\r\n\r\n", start)
      if stop.nil? || stop - start > MAX_HEAD
        raise HttpError.new(431, "request header section too large") if buf.bytesize - start > MAX_HEAD

        @buf = buf.byteslice(start, buf.bytesize - start) if start.positive?
        return false
      end
      head = buf.byteslice(start, stop + 4 - start)
      @raw = head
      rest = buf.bytesize - stop - 4
      @buf = rest.zero? ? +"".b : buf.byteslice(stop + 4, rest)
      # Worker#environ skips what it cannot read; a connection's own parser refuses it, as the
      # core's does (a field without a name or a colon, a name with spaces, a folded line).
      raise HttpError.new(400, "malformed request head") unless head.match?(HEAD_FORMAT)
      begin
        env, is_head, http11, client_close, client_keepalive = worker.environ(head, nil)
      rescue ProtocolError => e
        raise HttpError.new(400, e.message)
      end
      version = env["SERVER_PROTOCOL"]
      raise HttpError.new(400, "unsupported HTTP version") unless HTTP_VERSIONS[version]

      @head_line = head.byteslice(0, head.index("\n") || head.bytesize).chomp("\r")
      framing(env, http11)
      # A protocol switch this server does not make: answered plainly, then the connection closes.
      upgrade = (env.key?("HTTP_UPGRADE") && env["HTTP_CONNECTION"].to_s.downcase.include?("upgrade")) ||
                env["REQUEST_METHOD"] == "CONNECT"
      @request_info = [is_head, http11, client_close, client_keepalive, upgrade]
      @env = env
      true
    end

    # Reads the body framing from the head and sets the env's CONTENT_LENGTH to the body's
    # length as the app gets it (de-chunked); answers Expect: 100-continue.
    def framing(env, http11)
      coding = env.delete("HTTP_TRANSFER_ENCODING")
      length = env["CONTENT_LENGTH"]
      if coding
        raise HttpError.new(400, "both Transfer-Encoding and Content-Length") if length
        unless coding.downcase.delete(" \t") == "chunked"
          raise HttpError.new(501, "unsupported transfer coding")
        end

        @chunk_state = :size
        @body_left = nil
      elsif length
        values = length.split(",").map(&:strip).uniq
        raise HttpError.new(400, "conflicting Content-Length headers") if values.length != 1
        raise HttpError.new(400, "malformed Content-Length") unless values[0].match?(DIGITS)

        @body_left = values[0].to_i
        raise HttpError.new(413, "request body too large") if @body_left > MAX_BODY
      else
        @body_left = 0
      end
      expect = env["HTTP_EXPECT"]
      if expect
        raise HttpError.new(417, "unsupported expectation") unless expect.casecmp?("100-continue")

        # Asked before the body is sent: the client waits for it.
        if http11 && (@chunk_state || @body_left.positive?) && @buf.empty?
          begin
            @writer.write(CONTINUE)
          rescue SystemCallError, IOError
            @eof = true
          end
        end
      end
      @received = 0
      @body = nil
    end

    # Moves body bytes from the buffer into the body; sets ready once it is complete.
    def read_body
      return read_chunked if @chunk_state

      if @body_left.positive?
        take = [@body_left, @buf.bytesize].min
        if take.positive?
          data = take == @buf.bytesize ? @buf : @buf.byteslice(0, take)
          store(data)
          keep_raw(data)
          @buf = take == @buf.bytesize ? +"".b : @buf.byteslice(take, @buf.bytesize - take)
          @body_left -= take
        end
      end
      return unless @chunk_state.nil? && @body_left.zero?

      @env["CONTENT_LENGTH"] = @received.to_s if @received.positive? || @env.key?("CONTENT_LENGTH")
      @ready = true
    end

    def read_chunked
      buf = @buf
      pos = 0
      size = buf.bytesize
      while pos < size && @chunk_state != :done
        if @chunk_state == :data
          take = [@chunk_left, size - pos].min
          store(buf.byteslice(pos, take))
          pos += take
          @chunk_left -= take
          @chunk_state = :data_end if @chunk_left.zero?
          next
        end
        eol = buf.index(CRLF, pos)
        if eol.nil? || eol - pos > MAX_CHUNK_LINE
          raise HttpError.new(400, "chunk line too long") if (eol || size) - pos > MAX_CHUNK_LINE

          break
        end
        line = buf.byteslice(pos, eol - pos)
        pos = eol + 2
        case @chunk_state
        when :size
          text = line.split(";", 2)[0].to_s.strip
          raise HttpError.new(400, "malformed chunk size") unless text.match?(CHUNK_SIZE)

          chunk = text.to_i(16)
          raise HttpError.new(413, "request body too large") if @received + chunk > MAX_BODY

          if chunk.zero?
            @chunk_state = :trailer
          else
            @chunk_left = chunk
            @chunk_state = :data
          end
        when :data_end
          raise HttpError.new(400, "malformed chunk terminator") unless line.empty?

          @chunk_state = :size
        when :trailer
          @chunk_state = :done if line.empty?
        end
      end
      keep_raw(pos >= size ? buf : buf.byteslice(0, pos)) if pos.positive?
      @buf = pos >= size ? +"".b : buf.byteslice(pos, size - pos)
      return unless @chunk_state == :done

      @chunk_state = nil
      @env["CONTENT_LENGTH"] = @received.to_s
      @ready = true
    end

    def keep_raw(data)
      return unless @raw

      @raw = @raw.bytesize + data.bytesize > MAX_GIVE_BACK ? nil : @raw + data
    end

    # Appends body bytes: in memory, then in a temporary file once the body grows.
    def store(data)
      @received += data.bytesize
      if @body.nil?
        @body = StringIO.new(+"".b)
      elsif @body.is_a?(StringIO) && @received > BODY_IN_MEMORY
        file = Tempfile.new("appmanager-body")
        file.unlink
        file.binmode
        file.write(@body.string)
        @body = file
      end
      @body.write(data)
    end
  end

  # Serves whole connections for a Worker: the select loop over the control channel and the
  # connections, and the watcher thread that gives connections back while a request runs long or
  # requests wait their turn.
  #
  # Created with the Worker when the process takes connections; runs until the control channel
  # closes (or SIGTERM) and every connection has been given back or closed.
  # Locking: the main thread holds @lock except while the app runs a request; the watcher acts
  # only while it can take the lock, so it never sees a connection the main thread is changing.
  class ConnectionServer
    def initialize(worker, control, progress, config)
      @worker = worker
      @control = control
      @progress = progress
      @access_log = config.access_log
      limit = config.max_requests
      @count_every = limit.positive? ? (limit / 10).clamp(1, COUNT_EVERY) : COUNT_EVERY
      # The most requests the core may let this process serve (it staggers max_requests by up to
      # a tenth): past it the process gives its connections back, even if the core, busy, has not
      # yet read the counts that retire it.
      @request_ceiling = limit.positive? ? limit + limit / 10 : nil
      @served = 0
      @unreported = 0
      @connections = {} # seq => HttpConnection
      @by_io = {} # its IO => HttpConnection, for what select returns
      @ready = [] # connections with a whole request waiting, in arrival order
      @lock = Mutex.new
      @request_started = nil
      @current = nil
      @busy_sent = false
      # Messages the watcher read off the control channel that the main thread must handle (Q).
      @pending = []
      @watcher = nil
      @closing = false
      @control_open = true
      @next_sweep = 0
    end

    attr_reader :connections

    # Takes a C message's connection; raises ProtocolError for a malformed message.
    def add(message, end_of_line, fields, ios)
      if fields.length != 10
        raise ProtocolError, "expected 10 fields in a C line, got #{fields.join(" ").inspect}"
      end

      _, seq, slot, flags, raddr, rport, saddr, sport, scheme, length = fields
      seq = Integer(seq, 10)
      slot = Integer(slot, 10)
      length = Integer(length, 10)
      in_file = flags.include?("F")
      raise ProtocolError, "expected #{in_file ? 2 : 1} descriptors" if ios.length != (in_file ? 2 : 1)

      data =
        if in_file
          ios[1].pread(length, 0)
        else
          message.byteslice(end_of_line + 1, message.bytesize - end_of_line - 1)
        end
      raise ProtocolError, "C data is #{data.bytesize} bytes, not #{length}" if data.bytesize != length

      ios[1]&.close
      conn = HttpConnection.new(ios[0], seq, slot, @progress,
                                [raddr, rport, saddr, sport, SCHEMES[scheme] || scheme], data.b)
      @connections[seq] = conn
      @by_io[conn.io] = conn
      start_watcher
      advance(conn)
    end

    # Serves until no connection is left. Returns false when the control channel failed (the
    # core is gone).
    def run
      @lock.lock
      until @connections.empty?
        handle_pending unless @pending.empty?
        serve_ready
        wait_and_read
        sweep
      end
      true
    rescue SystemCallError, IOError => e
      AppManager.log("control channel failed: #{e.message}")
      false
    ensure
      @lock.unlock if @lock.owned?
    end

    # The control channel said EOF, SIGTERM came, or the request ceiling was reached: give back
    # every connection that can go, serve what is in flight and give it back after, and give back
    # whatever the core still sends.
    def close
      @closing = true
      @connections.values.each { |conn| give_back(conn) if conn.returnable? }
    end

    # Stopped for good: the core closed the channel, or SIGTERM came. (Past its request ceiling
    # the process still takes what the core sends until the core retires it, and gives it back.)
    def finished?
      @closing && (!@control_open || @worker.stopping)
    end

    private

    def start_watcher
      return if @watcher&.alive?

      @watcher = Thread.new { watch }
      @watcher.name = "appmanager connections"
    end

    # The watcher thread: every WATCH_INTERVAL, when a request has run BUSY_AFTER, or one has
    # waited that long for its turn (more requests come than the process serves), or the core sent
    # a connection while a request runs (overloaded?), says S and gives back every connection it
    # can: those idle between requests, those whose request waits, and those the core sent
    # meanwhile (C messages not yet read). The core then queues their requests, serves them
    # elsewhere, and starts processes for them as for any busy app.
    def watch
      loop do
        sleep WATCH_INTERVAL
        next unless @lock.try_lock

        begin
          next if @busy_sent || !overloaded?

          @busy_sent = true
          @control.send("S", 0)
          take_pending_connections
          @connections.values.each do |conn|
            give_back(conn) if !conn.equal?(@current) && conn.returnable?
          end
        rescue SystemCallError, IOError
          nil # the core is gone; the main thread finds out
        ensure
          @lock.unlock
        end
      end
    end

    # Has a request run, or waited, BUSY_AFTER, or has a new connection come in while one runs?
    def overloaded?
      now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      started = @request_started
      if started
        running = now - started
        return true if running >= BUSY_AFTER
        return true if running >= NEW_CONNECTION_AFTER && @control_open && message_waiting?
      end
      @ready.any? { |conn| conn.ready_at && now - conn.ready_at >= BUSY_AFTER }
    end

    # Has the core sent something the main thread has not read (a new connection)?
    def message_waiting?
      !@control.recv_nonblock(1, Socket::MSG_PEEK, exception: false).equal?(:wait_readable)
    end

    # Reads what the core sent while the main thread was in the app: connections are taken (to
    # be given back), anything else waits for the main thread; EOF stops the process.
    def take_pending_connections
      read_control do |message, msg_flags, ios|
        if message.start_with?("C ")
          @worker.take_connection(message, msg_flags, ios)
        else
          @pending << [message, msg_flags, ios]
        end
      end
    end

    def handle_pending
      pending = @pending
      @pending = []
      pending.each { |message| @worker.handle_message(*message) }
    end

    # Serves the requests waiting at the start of this round, in order. A connection with bytes
    # behind the request it just had served goes to the end of the line unparsed, and is parsed
    # when its turn comes: until then it may still go back to the core whole (B).
    def serve_ready
      return if @ready.empty?

      # The rest of the round stays in @ready, where the watcher sees how long it waits.
      @ready.size.times do
        conn = @ready.shift
        break if conn.nil? # the watcher gave the rest back
        next unless @connections[conn.seq].equal?(conn)

        unless conn.ready
          advance(conn, queue: false)
          next unless conn.ready
        end
        serve(conn)
      end
    end

    # Waits for the control channel or a connection to be readable (not at all when requests
    # wait), and reads what came.
    def wait_and_read
      close if @worker.stopping && !@closing # SIGTERM during a request
      readers = []
      readers << @control if @control_open
      @connections.each_value do |conn|
        if conn.lingering || !(conn.ready || conn.eof || conn.buf.bytesize > MAX_BUFFERED)
          readers << conn.io
        end
      end
      return if readers.empty?

      begin
        # A TERM while idle raises Stop here (Worker#on_sigterm): stop as at EOF.
        @worker.idle = @ready.empty?
        readable, = IO.select(readers, nil, nil, @ready.empty? ? 1 : 0)
      rescue Stop
        close
        return
      ensure
        @worker.idle = false
      end
      readable&.each do |io|
        if io.equal?(@control)
          read_control
        else
          conn = @by_io[io]
          read_connection(conn) if conn
        end
      end
    end

    # Reads every message the core has sent, handing each to the block (the Worker's handler by
    # default); EOF stops the process.
    def read_control
      loop do
        message, _, msg_flags, *controls =
          @control.recvmsg_nonblock(MAX_MESSAGE, 0, ANCILLARY_SIZE, scm_rights: true,
                                                                     exception: false)
        return if message == :wait_readable

        if message.empty? && controls.empty?
          @control_open = false
          close
          return
        end
        ios = AppManager.received_ios(controls)
        if block_given?
          yield message, msg_flags, ios
        else
          @worker.handle_message(message, msg_flags, ios)
        end
      end
    end

    def read_connection(conn)
      data = conn.io.read_nonblock(READ_SIZE, exception: false)
      return if data == :wait_readable

      conn.last_active = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      if conn.lingering
        finish_close(conn) if data.nil?
        return
      end
      if data.nil?
        # The client closed its side: what it sent before is still answered (a request queued, or
        # whole in the buffer), then the connection closes; a request not yet complete never
        # will be.
        conn.eof = true
        advance(conn) unless @ready.include?(conn)
        return
      end
      if conn.buf.empty?
        conn.buf = data
      else
        conn.buf << data
      end
      advance(conn)
    rescue SystemCallError, IOError
      conn.eof = true
      if conn.lingering
        finish_close(conn)
      elsif !conn.ready
        close_connection(conn, linger: false)
      end
    end

    # Parses the connection's buffer; queues it once a request is whole (unless the caller serves
    # it at once), refuses a bad one.
    def advance(conn, queue: true)
      return if conn.ready || conn.lingering

      now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      # A request's READ_TIMEOUT runs from its first byte.
      conn.started ||= now unless conn.buf.empty?
      if conn.parse(@worker)
        conn.ready_at = now
        @ready << conn if queue
      elsif conn.eof
        close_connection(conn)
      end
    rescue HttpError => e
      refuse(conn, e)
    rescue StandardError => e
      # The shim's own failure, not the app's: this connection cannot go on, the others can.
      AppManager.log("connection #{conn.seq}: internal error:\n#{e.full_message(highlight: false)}")
      close_connection(conn, linger: false)
    end

    # Serves the connection's waiting request: the app, its response, the slot and the reports.
    def serve(conn)
      env = conn.env
      is_head, http11, client_close, client_keepalive, upgrade = conn.request_info
      number = conn.number += 1
      body = conn.take_body
      conn.served
      env["REMOTE_ADDR"] = conn.raddr
      env["REMOTE_PORT"] = conn.rport
      env["SERVER_NAME"] = conn.saddr
      env["SERVER_PORT"] = conn.sport
      env["rack.url_scheme"] = conn.scheme
      env["rack.input"] =
        if body.nil?
          StringIO.new(EMPTY)
        elsif body.is_a?(StringIO)
          body.rewind
          body
        else
          body.flush
          BodyFile.new(body, body.size)
        end
      # Stopping or not: a connection that may stay open goes back to the core after this.
      keep_alive = !client_close && (http11 || client_keepalive) && !upgrade
      response = Response.new(
        @worker.context, conn.writer, conn.seq, is_head, http11, client_keepalive, keep_alive
      )
      response.mark(conn.mark, number << 2 | SLOT_RESPONDING)
      @progress.set_slot(conn.slot, number << 2 | SLOT_RECEIVED)
      @current = conn
      @request_started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      @lock.unlock
      begin
        @worker.run_app(env, response)
      ensure
        @lock.lock
        @request_started = nil
        @current = nil
        body.close if body.is_a?(Tempfile)
      end
      @progress.set_slot(conn.slot, number << 2 | SLOT_IDLE)
      if @busy_sent
        @busy_sent = false
        @control.send("R", 0)
      end
      report(conn, response, env)
      conn.last_active = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      if !response.keep_alive || !response.finished
        close_connection(conn)
      elsif @closing && conn.returnable?
        give_back(conn)
      elsif !conn.buf.empty?
        @ready << conn # a request behind this one: parsed when its turn comes
      elsif conn.eof
        close_connection(conn)
      end
    end

    # Counts a served request (N) and reports it for the access log (L).
    def report(conn, response, env)
      if response.sent >= 0 || response.finished
        @served += 1
        @unreported += 1
        if @unreported >= @count_every
          @control.send("N #{@unreported}", 0)
          @unreported = 0
        end
        close if @request_ceiling && @served >= @request_ceiling && !@closing
      end
      return unless @access_log

      status, sent = response.sent.negative? ? ["-", "-"] : [response.code, response.sent]
      fields = [conn.head_line, env["HTTP_REFERER"], env["HTTP_USER_AGENT"]].map do |field|
        field.to_s.byteslice(0, MAX_LOG_FIELD)
      end
      @control.send("L #{conn.seq} #{status} #{sent}\n#{fields.join("\n")}", 0)
    end

    # Answers a refused request and closes the connection.
    def refuse(conn, error)
      AppManager.log("refused a request with #{error.status}: #{error.message}")
      reason = REFUSALS[error.status] || "Error"
      text = "#{error.status} #{reason}: #{error.message}\n"
      begin
        conn.writer.write(
          "HTTP/1.1 #{error.status} #{reason}\r\nContent-Type: text/plain\r\n" \
          "Content-Length: #{text.bytesize}\r\nConnection: close\r\n\r\n#{text}"
        )
      rescue SystemCallError, IOError
        nil
      end
      close_connection(conn)
    end

    # Closes a connection: FIN, then a linger that throws away what the client still sends,
    # then X. Without linger (the client is gone) at once.
    def close_connection(conn, linger: true)
      return if conn.lingering

      begin
        conn.io.shutdown(Socket::SHUT_WR)
      rescue SystemCallError, IOError
        linger = false
      end
      @ready.delete(conn)
      if linger && !conn.eof
        conn.lingering = Process.clock_gettime(Process::CLOCK_MONOTONIC) + LINGER_TIME
        conn.env = nil
        return
      end
      finish_close(conn)
    end

    def finish_close(conn)
      forget(conn)
      @progress.set_slot(conn.slot, conn.number << 2 | SLOT_IDLE)
      conn.io.close
      @control.send("X #{conn.seq} #{@unreported}", 0)
      @unreported = 0
    end

    # Gives an idle connection back to the core (B) with the bytes it read and did not serve.
    def give_back(conn)
      forget(conn)
      @ready.delete(conn)
      @progress.set_slot(conn.slot, conn.number << 2 | SLOT_IDLE)
      data = conn.give_back_bytes
      conn.io.close
      @control.send("B #{conn.seq} #{@unreported}\n#{data}", 0)
      @unreported = 0
    end

    def forget(conn)
      @connections.delete(conn.seq)
      @by_io.delete(conn.io)
    end

    # About once a second: closes connections idle too long, refuses requests that take too
    # long to arrive, and ends lingers.
    def sweep
      now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      return if now < @next_sweep

      @next_sweep = now + 1
      @connections.values.each do |conn|
        if conn.lingering
          finish_close(conn) if now > conn.lingering
        elsif conn.ready
          next
        elsif conn.started
          if now - conn.started > READ_TIMEOUT
            refuse(conn, HttpError.new(408, "request not received in time"))
          end
        elsif now - conn.last_active > IDLE_TIMEOUT
          close_connection(conn)
        end
      end
    end
  end
end
