# frozen_string_literal: true

# A one-file Rails app for the framework tests: only Action Controller, no database.

require "action_controller/railtie"
require "logger"

class RailsApp < Rails::Application
  config.load_defaults 6.1
  config.root = __dir__
  config.eager_load = false
  config.secret_key_base = "appmanager-test-secret-key-base-not-secret"
  config.hosts.clear
  config.logger = Logger.new($stdout)
  config.log_level = :info
end

# Before the controller: the defaults add forgery protection to ActionController::Base, which the
# controller then skips.
RailsApp.initialize!

class ItemsController < ActionController::Base
  skip_forgery_protection

  def index
    render plain: "Hello from Rails"
  end

  def show
    render json: {
      id: params[:id], q: params[:q], path: request.path, script_name: request.script_name
    }
  end

  def create
    item = params.require(:item).permit(:name, :count)
    render json: { item: item.to_h, format: request.content_mime_type.to_s }, status: :created
  end

  def fail
    raise ArgumentError, "rails action failed"
  end
end

RailsApp.routes.draw do
  root "items#index"
  get "/items/:id", to: "items#show"
  post "/items", to: "items#create"
  get "/fail", to: "items#fail"
end

run RailsApp
